# Included after every project() call of a colcon-built CMake package (CMAKE_PROJECT_INCLUDE,
# set in the colcon defaults file that tools/setup.sh writes).
#
# Why: the ros-jazzy-* wheels were built in a manylinux container and their exported CMake
# targets hard-code include directories under /opt/python/cp311-cp311/... . Passing
# -DPython3_INCLUDE_DIR does not reach those targets. Instead of creating /opt/python (root,
# global) or editing site-packages, we defer a pass to the end of the top-level directory,
# when every find_package() has run, and rewrite such entries on the imported targets to the
# include directories of the interpreter CMake found (the venv's Python and its NumPy).
if(COMMAND habc_rewrite_wheel_include_dirs)
  return()
endif()

find_package(Python3 REQUIRED COMPONENTS Interpreter Development NumPy)

function(habc_rewrite_wheel_include_dirs)
  get_property(imported_targets DIRECTORY "${CMAKE_SOURCE_DIR}" PROPERTY IMPORTED_TARGETS)
  foreach(target IN LISTS imported_targets)
    get_target_property(include_dirs ${target} INTERFACE_INCLUDE_DIRECTORIES)
    if(NOT include_dirs OR NOT include_dirs MATCHES "/opt/python/")
      continue()
    endif()
    set(fixed_dirs "")
    foreach(dir IN LISTS include_dirs)
      if(dir MATCHES "^/opt/python/.*numpy")
        list(APPEND fixed_dirs ${Python3_NumPy_INCLUDE_DIRS})
      elseif(dir MATCHES "^/opt/python/")
        list(APPEND fixed_dirs ${Python3_INCLUDE_DIRS})
      else()
        list(APPEND fixed_dirs "${dir}")
      endif()
    endforeach()
    list(REMOVE_DUPLICATES fixed_dirs)
    set_target_properties(${target} PROPERTIES INTERFACE_INCLUDE_DIRECTORIES "${fixed_dirs}")
  endforeach()
endfunction()

cmake_language(DEFER DIRECTORY "${CMAKE_SOURCE_DIR}" CALL habc_rewrite_wheel_include_dirs)
