# ctest's install.find_package: cmake --install into WORK_DIR/prefix, then a consumer project that
# knows only that prefix is configured, built and run (find_package, shared and static), a C
# program is built with the flags pkg-config gives for the installed packinfer.pc, and this
# project is configured with -DPACKINFER_LIBRARY=<the installed .so> and its examples run. The
# installed library is checked for its layout (libpackinfer.so -> libpackinfer.so.<ABI>, the
# SONAME) and for stripped debug info; and this project is configured, built and installed with
# GoogleTest hidden, as on a machine without it.
function(run)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
  message("$ ${ARGN}\n${out}")
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "failed (${rc}): ${ARGN}")
  endif()
  set(run_output "${out}" PARENT_SCOPE)
endfunction()

set(prefix "${WORK_DIR}/prefix")
file(REMOVE_RECURSE "${WORK_DIR}")
run("${CMAKE_COMMAND}" --install "${BUILD_DIR}" --prefix "${prefix}")
foreach(f include/packinfer.h include/packinfer.hpp lib/libpackinfer.so lib/${SONAME} lib/libpackinfer.a
          lib/cmake/packinfer/packinfer-config.cmake lib/cmake/packinfer/packinfer-config-version.cmake
          lib/pkgconfig/packinfer.pc)
  if(NOT EXISTS "${prefix}/${f}")
    message(FATAL_ERROR "cmake --install did not install ${f}")
  endif()
endforeach()

# The file under its SONAME, and the link-time name pointing to it.
if(NOT IS_SYMLINK "${prefix}/lib/libpackinfer.so" OR IS_SYMLINK "${prefix}/lib/${SONAME}")
  message(FATAL_ERROR "lib/libpackinfer.so should be a link to the file lib/${SONAME}")
endif()
file(READ_SYMLINK "${prefix}/lib/libpackinfer.so" target)
if(NOT target STREQUAL SONAME)
  message(FATAL_ERROR "lib/libpackinfer.so points to ${target}, not ${SONAME}")
endif()
run("${READELF}" -d "${prefix}/lib/${SONAME}")
if(NOT run_output MATCHES "Library soname: \\[${SONAME}\\]")
  message(FATAL_ERROR "the installed library's SONAME is not ${SONAME}")
endif()
# Installed without debug info (the build tree keeps it).
execute_process(COMMAND "${READELF}" -S -W "${prefix}/lib/${SONAME}" OUTPUT_VARIABLE sections)
if(sections MATCHES "\\.debug_info")
  message(FATAL_ERROR "the installed ${SONAME} still has debug info")
endif()
foreach(f ${SONAME} libpackinfer.a)
  file(SIZE "${prefix}/lib/${f}" installed_size)
  message("installed lib/${f}: ${installed_size} bytes")
endforeach()

# find_package from a project that knows nothing but the prefix.
run("${CMAKE_COMMAND}" -S "${CONSUMER_DIR}" -B "${WORK_DIR}/consumer-build" -G "${GENERATOR}"
    "-DCMAKE_PREFIX_PATH=${prefix}" -DCMAKE_BUILD_TYPE=Release)
if(NOT run_output MATCHES "packinfer found at ${prefix}")
  message(FATAL_ERROR "the consumer found packinfer somewhere else than ${prefix}")
endif()
run("${CMAKE_COMMAND}" --build "${WORK_DIR}/consumer-build")
foreach(exe consumer_shared consumer_static)
  run("${WORK_DIR}/consumer-build/${exe}")
  if(NOT run_output MATCHES "consumer ok")
    message(FATAL_ERROR "${exe} did not say 'consumer ok'")
  endif()
endforeach()
run("${READELF}" -d "${WORK_DIR}/consumer-build/consumer_shared")
if(NOT run_output MATCHES "Shared library: \\[${SONAME}\\]")
  message(FATAL_ERROR "consumer_shared does not record ${SONAME} as needed")
endif()

# pkg-config, for build systems without CMake.
if(PKG_CONFIG)
  set(ENV{PKG_CONFIG_PATH} "${prefix}/lib/pkgconfig")
  run("${PKG_CONFIG}" --modversion packinfer)
  run("${PKG_CONFIG}" --cflags --libs packinfer)
  string(STRIP "${run_output}" flags)
  separate_arguments(flags UNIX_COMMAND "${flags}")
  run("${C_COMPILER}" "${CONSUMER_DIR}/consumer.c" ${flags} -o "${WORK_DIR}/consumer_pkgconfig")
  run("${WORK_DIR}/consumer_pkgconfig")
  if(NOT run_output MATCHES "consumer ok")
    message(FATAL_ERROR "the pkg-config consumer did not say 'consumer ok'")
  endif()
else()
  message(FATAL_ERROR "pkg-config is not installed; it is needed to check packinfer.pc")
endif()
# This project itself with a prebuilt library instead of cargo: the examples build and run.
run("${CMAKE_COMMAND}" -S "${SOURCE_DIR}" -B "${WORK_DIR}/prebuilt-build" -G "${GENERATOR}"
    "-DPACKINFER_LIBRARY=${prefix}/lib/libpackinfer.so" "-DPACKINFER_INCLUDE_DIR=${prefix}/include"
    -DPACKINFER_BUILD_TESTS=OFF -DPACKINFER_BUILD_EXAMPLES=ON)
run("${CMAKE_COMMAND}" --build "${WORK_DIR}/prebuilt-build")
run("${WORK_DIR}/prebuilt-build/examples/cpp/packinfer_example_engine_step")
if(NOT run_output MATCHES "layer 1 done")
  message(FATAL_ERROR "the example built against the prebuilt library did not finish")
endif()
execute_process(COMMAND ldd "${WORK_DIR}/prebuilt-build/examples/cpp/packinfer_example_engine_step" OUTPUT_VARIABLE ldd_out)
if(NOT ldd_out MATCHES "${prefix}/lib/libpackinfer.so")
  message(FATAL_ERROR "the example did not load the prebuilt library from ${prefix}/lib:\n${ldd_out}")
endif()
# A machine without GoogleTest: the default configure leaves the tests off and says why, and
# configure, build and install work (CMAKE_DISABLE_FIND_PACKAGE_GTest hides an installed one).
run("${CMAKE_COMMAND}" -S "${SOURCE_DIR}" -B "${WORK_DIR}/no-gtest-build" -G "${GENERATOR}"
    -DCMAKE_DISABLE_FIND_PACKAGE_GTest=ON)
if(NOT run_output MATCHES "GoogleTest not found: PACKINFER_BUILD_TESTS defaults to OFF")
  message(FATAL_ERROR "configuring without GoogleTest did not say that the tests are off")
endif()
run("${CMAKE_COMMAND}" --build "${WORK_DIR}/no-gtest-build")
run("${CMAKE_COMMAND}" --install "${WORK_DIR}/no-gtest-build" --prefix "${WORK_DIR}/no-gtest-prefix")
foreach(f include/packinfer.h lib/libpackinfer.so lib/${SONAME} lib/cmake/packinfer/packinfer-config.cmake lib/pkgconfig/packinfer.pc)
  if(NOT EXISTS "${WORK_DIR}/no-gtest-prefix/${f}")
    message(FATAL_ERROR "cmake --install without GoogleTest did not install ${f}")
  endif()
endforeach()
# And asking for the tests there fails, naming what is missing.
execute_process(COMMAND "${CMAKE_COMMAND}" -S "${SOURCE_DIR}" -B "${WORK_DIR}/no-gtest-tests" -G "${GENERATOR}"
                        -DCMAKE_DISABLE_FIND_PACKAGE_GTest=ON -DPACKINFER_BUILD_TESTS=ON
                RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
if(rc EQUAL 0 OR NOT out MATCHES "GoogleTest was not found")
  message(FATAL_ERROR "-DPACKINFER_BUILD_TESTS=ON without GoogleTest should fail and say so:\n${out}")
endif()
message("install test passed")
